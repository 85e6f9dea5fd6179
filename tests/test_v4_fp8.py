"""DeepSeek-V4 under the FP8 recipe (``--precision fp8``): its grouped ``wo_a`` (head group g times its own rows of
the weight, ``HybridAttention.output``) runs as FP8 GEMMs like every other projection, not in the master weight's
precision as it did: ``FP8Linear.grouped`` equals each group's ``fp8_linear`` on its row block, forward and
backward, while the unquantized product is far off; and a whole ``tiny-v4`` converted with ``convert_to_fp8``
trains through it.

Tolerance: both sides multiply the same dequantized FP8 operands exactly and sum a reduction of n terms in FP32,
perhaps in different orders, so they differ by at most 2 n u (|a| |b|) elementwise (u = 2^-24), taken here at the
operands' largest such product; the dequantized operands exceed the originals by at most one E4M3 step (2^-3),
counted as a factor 1.25 on each."""

import pytest
import torch

from flyer.config import preset
from flyer.fp8.linear import FP8Linear, convert_to_fp8, fp8_linear
from flyer.model.lowp import grouped_linear
from flyer.model.transformer import Transformer

U = 2.0 ** -24


def _bound(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """2 n u max(|a| |b|) with both operands' dequantization growth (module docstring); a (M, n), b (n, P)."""
    return 2 * n * U * float((a.abs() @ b.abs()).max()) * 1.25 ** 2


@pytest.mark.parametrize("L", [64, 128])  # a group's rows within one 128-row block, or a whole block as in V4
def test_fp8_grouped_wo_a_is_each_groups_fp8_linear(L):
    torch.manual_seed(0)
    G, K, B, T = 2, 128, 2, 37
    wo_a = FP8Linear(K, G * L, bias=False)
    x = torch.randn(B, T, G, K, requires_grad=True)
    got = wo_a.grouped(x)
    w = wo_a.weight.detach().clone().requires_grad_(True)
    xs = x.detach().clone().requires_grad_(True)
    want = torch.stack([fp8_linear(xs[:, :, g], w[g * L:(g + 1) * L], recipe=wo_a.recipe) for g in range(G)], dim=2)
    assert got.shape == want.shape == (B, T, G, L)
    x2, w2 = x.detach().reshape(-1, G, K), wo_a.weight.detach().view(G, L, K)
    tol = max(_bound(x2[:, g], w2[g].t(), K) for g in range(G))
    assert (got - want).abs().max() <= tol
    plain = grouped_linear(x.detach(), wo_a.weight.detach())  # what ran before: no quantization
    assert (plain - want.detach()).abs().max() > 100 * tol
    r = torch.randn_like(got)
    (got * r).sum().backward()
    (want * r).sum().backward()
    r2 = r.reshape(-1, G, L)
    dx_tol = max(_bound(r2[:, g], w2[g], L) for g in range(G))
    dw_tol = max(_bound(r2[:, g].t(), x2[:, g], B * T) for g in range(G))
    assert (x.grad - xs.grad).abs().max() <= dx_tol
    assert (wo_a.weight.grad - w.grad).abs().max() <= dw_tol


def test_tiny_v4_trains_through_fp8_wo_a():
    torch.manual_seed(0)
    model = convert_to_fp8(Transformer(preset("tiny-v4")))
    assert all(isinstance(layer.attn.wo_a, FP8Linear) for layer in model.layers)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.attn.wo_a.weight.grad.abs().sum() > 0 for layer in model.layers)
