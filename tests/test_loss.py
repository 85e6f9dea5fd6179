"""Fused chunked head + cross-entropy against the unfused F.cross_entropy oracle."""

import pytest
import torch
import torch.nn.functional as F

from flyer.config import preset
from flyer.model.loss import linear_cross_entropy, reference_cross_entropy
from flyer.model.transformer import Transformer


def _case(N=300, D=32, V=97, ignored=7, dtype=torch.float32):
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(V, D, dtype=dtype)).requires_grad_()
    t = torch.randint(0, V, (N,))
    if ignored:
        t[::ignored] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t, autocast=False, scale=0.7):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, t)
    gh, gw = torch.autograd.grad(scale * loss, (h, w))  # a grad_output other than 1
    return loss, gh, gw


@pytest.mark.parametrize("ignored", [0, 7])
def test_matches_cross_entropy_fp32(ignored, cpu_kernels):
    h, w, t = _case(ignored=ignored)  # 300 rows: not a multiple of the chunk
    ref = _loss_and_grads(reference_cross_entropy, h, w, t)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=64), h, w, t)
    assert got[0].dtype == torch.float32
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_matches_cross_entropy_bf16_autocast(cpu_kernels):
    h, w, t = _case()
    ref = _loss_and_grads(reference_cross_entropy, h, w, t, autocast=True)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=64), h, w, t, autocast=True)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], ref[1:]):  # BF16 GEMMs: a few BF16 ulps
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_matches_cross_entropy_bf16_params(cpu_kernels):
    h, w, t = _case(dtype=torch.bfloat16)
    ref = _loss_and_grads(reference_cross_entropy, h, w, t)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=64), h, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_all_rows_ignored_is_nan_with_zero_grads():
    # As F.cross_entropy's mean reduction: 0/0 loss, no gradient.
    h, w, t = _case(N=10, ignored=1)
    loss, gh, gw = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=4), h, w, t)
    assert torch.isnan(loss) and torch.isnan(reference_cross_entropy(h, w, t))
    assert not gh.any() and not gw.any()


def test_no_grad_matches_and_skips_gradients(cpu_kernels):
    h, w, t = _case()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk_rows=64)
        ref = reference_cross_entropy(h, w, t)
    assert got.grad_fn is None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_only_weight_requires_grad():
    h, w, t = _case()
    h = h.detach()
    ref = torch.autograd.grad(reference_cross_entropy(h, w, t), w)[0]
    got = torch.autograd.grad(linear_cross_entropy(h, w, t, chunk_rows=64), w)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64():
    h, w, t = _case(N=10, D=4, V=7, ignored=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, chunk_rows=3), (h, w))


def test_bad_shapes_raise():
    h, w, t = _case()
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w.t(), t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])


def _old_compute_loss(model, tokens, targets):
    """Transformer.compute_loss before the fused head loss: full logits, FP32 cross-entropy."""
    h = model.hidden(tokens)
    main = F.cross_entropy(model.head(model.norm(h)).float().flatten(0, 1), targets.flatten())
    mtp = [F.cross_entropy(model.head(mod.norm(hk)).float().flatten(0, 1), targets[:, k:].flatten())
           for k, (mod, hk) in enumerate(zip(model.mtp, model.mtp_hidden(h, tokens)), start=1)]
    loss = main + model.cfg.mtp_loss_weight * torch.stack(mtp).mean()
    aux = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return loss + torch.stack(aux).sum() if aux else loss, main


@pytest.mark.parametrize("tie", [False, True])
def test_compute_loss_matches_old_formulation(tie):
    model = Transformer(preset("tiny", tie_embeddings=tie)).train()
    x = torch.randint(0, model.cfg.vocab_size, (2, 33))
    tokens, targets = x[:, :-1], x[:, 1:]
    out = model.compute_loss(tokens, targets)
    out.loss.backward()
    new = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, main = _old_compute_loss(model, tokens, targets)
    loss.backward()
    old = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out.main_loss, main, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert new.keys() == old.keys() and ("embed.weight" if tie else "head.weight") in new  # tied: one name
    for n in old:
        torch.testing.assert_close(new[n], old[n], rtol=1e-4, atol=1e-6, msg=n)
