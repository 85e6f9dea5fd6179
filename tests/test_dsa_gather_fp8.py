"""DeepSeek Sparse Attention's gathered path under the FP8 recipe (``flyer.model.dsa_chunks.absorption_weight``):
the absorbed W_UK / W_UV products take ``wkv_b``'s weight as the FP8 recipe quantizes it (128x128 blocks,
``FP8Linear.dequantized_weight``), as DeepSeek's sparse MLA absorbs the weight dequantized from its FP8 blocks,
with the gradient straight through to the FP32 master weight (the FP8 linear's dW). Against the masked form of the
same layer with a plain ``wkv_b`` holding that quantized-dequantized weight (the oracle): output and every
gradient within ``layer_tolerance`` (``tests/test_dsa_gather_train.py``, its A measured on that weight); the
master-weight absorption (the behaviour before) lands the quantization's effect away, over 10 times the bound
(measured: output 57x, ``wkv_b``'s gradient 22x the worst-case bound, ~10^5 times the measured gap, 3e-7).
Tiny MLA of ``tests/test_dsa_gather_train.py`` (wkv_b 256 x 32: two 128x128 blocks), FP32, CPU."""

import copy

import torch

import flyer.model.dsa_chunks as dsa_chunks
import tests.test_dsa_gather_train as gather_train
from flyer.fp8 import FP8Linear, FP8Recipe, convert_to_fp8, quantize_blocks
from tests.test_dsa_gather_train import CFG, T, _layer, _model, _model_outputs, _outputs, layer_tolerance, rel


def _only_wkv_b(name, module) -> bool:
    return name.rsplit(".", 1)[-1] == "wkv_b"


def _dequantized(w: torch.Tensor, recipe: FP8Recipe = FP8Recipe()) -> torch.Tensor:
    """The weight as the FP8 recipe's forward GEMM sees it (``FP8LinearFunction``: ``quantize_blocks``)."""
    return quantize_blocks(w.detach(), recipe.fmt, recipe.pow2_scales).dequantize()


def _layers(monkeypatch):
    """(the tiny layer with an FP8 ``wkv_b``, the plain layer holding its quantized-dequantized weight: the oracle,
    the plain layer with the master weight, ``layer_tolerance`` measured on the oracle)."""
    plain = _layer()
    fp8 = convert_to_fp8(copy.deepcopy(plain), _only_wkv_b)
    assert isinstance(fp8.wkv_b, FP8Linear) and not isinstance(fp8.wq_b, FP8Linear)
    oracle = copy.deepcopy(plain)
    with torch.no_grad():
        oracle.wkv_b.weight.copy_(_dequantized(plain.wkv_b.weight))
    monkeypatch.setattr(gather_train, "_layer", lambda seed=0: copy.deepcopy(oracle))  # A of the oracle's weight
    return fp8, oracle, plain, layer_tolerance(oracle, T)


def test_dequantized_weight_is_the_recipes_blocks_gradient_straight_through():
    """``FP8Linear.dequantized_weight``: the recipe's 128x128 blocks (a UE8M0 recipe's differ), FP32, the gradient
    passed to the master weight unchanged; the weight moved by about E4M3's half ulp (2^-4 of a value)."""
    w = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    for recipe in (FP8Recipe(), FP8Recipe(pow2_scales=True)):
        layer = FP8Linear(32, 256, bias=False, recipe=recipe)
        with torch.no_grad():
            layer.weight.copy_(w)
        got = layer.dequantized_weight()
        assert got.dtype == torch.float32 and torch.equal(got, _dequantized(w, recipe))
        assert 2.0 ** -8 < float((got.detach() - w).abs().max() / w.abs().max()) <= 2.0 ** -4
        g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
        (got * g).sum().backward()
        assert torch.equal(layer.weight.grad, g)
    pow2 = FP8Linear(32, 256, bias=False, recipe=FP8Recipe(pow2_scales=True))
    with torch.no_grad():
        pow2.weight.copy_(w)
    assert not torch.equal(pow2.dequantized_weight(), _dequantized(w))


def test_gathered_fp8_equals_masked_on_the_dequantized_weight(monkeypatch):
    """With an FP8 ``wkv_b`` the gathered path (several chunks: recomputed in backward; one chunk: plain autograd)
    is the masked oracle on the quantized-dequantized weight: output, the input's gradient and every trainable
    parameter's, ``wkv_b``'s master weight's included, within ``layer_tolerance``."""
    fp8, oracle, _, (tol, gtol) = _layers(monkeypatch)
    want, gx_want, gp_want = _outputs(oracle, T, None, gather=False, grad=True)
    assert "wkv_b.weight" in gp_want
    for chunk in (16, 128):
        got, gx, gp = _outputs(fp8, T, chunk, gather=True, grad=True)
        assert rel(got, want) <= tol, f"chunk {chunk}: {rel(got, want):.3g} > {tol:.3g}"
        assert rel(gx, gx_want) <= gtol, f"chunk {chunk}: input gradient"
        assert gp.keys() == gp_want.keys()
        for name, g in gp.items():
            err = rel(g, gp_want[name])
            assert err <= gtol, f"chunk {chunk}, {name}: {err:.3g} > {gtol:.3g}"


def test_master_weight_absorption_is_the_quantizations_effect_away(monkeypatch):
    """The quantization moves the masked output over 10 times ``layer_tolerance`` (a worst-case bound; 57x); the
    gathered FP8 path moves from the master-weight one by that same difference, within the two paths' bounds (its
    own and the plain layer's); and absorbing the master weight (the behaviour before) misses the oracle over 10
    times the bound, its output and ``wkv_b``'s gradient (22x)."""
    fp8, oracle, plain, (tol, gtol) = _layers(monkeypatch)
    monkeypatch.undo()
    tol_plain, _ = layer_tolerance(plain, T)
    masked_q, _, gp_q = _outputs(oracle, T, None, gather=False, grad=True)
    masked_m, _, _ = _outputs(plain, T, None, gather=False, grad=False)
    gathered_q, _, _ = _outputs(fp8, T, 16, gather=True, grad=False)
    gathered_m, _, _ = _outputs(plain, T, 16, gather=True, grad=False)
    effect = float((masked_q - masked_m).abs().max())
    assert effect > 10 * tol * float(masked_q.abs().max())
    slack = tol * float(masked_q.abs().max()) + tol_plain * float(masked_m.abs().max())
    assert float(((gathered_q - gathered_m) - (masked_q - masked_m)).abs().max()) <= slack
    monkeypatch.setattr(dsa_chunks, "absorption_weight", lambda wkv_b: wkv_b.weight)
    old, _, gp_old = _outputs(fp8, T, 16, gather=True, grad=True)
    assert rel(old, masked_q) > 10 * tol
    assert rel(gp_old["wkv_b.weight"], gp_q["wkv_b.weight"]) > 10 * gtol


def test_fp8_model_absorbs_every_dsa_layers_dequantized_wkv_b(monkeypatch):
    """A tiny V3.2-shaped model under ``convert_to_fp8`` (the recipe of ``--precision fp8``) gathering in chunks of
    16 takes every DSA layer's ``wkv_b`` through ``dequantized_weight``, forward and recomputed backward, and its
    master weights get gradients."""
    model = convert_to_fp8(_model())
    calls = []
    orig = FP8Linear.dequantized_weight
    monkeypatch.setattr(FP8Linear, "dequantized_weight", lambda self: calls.append(self) or orig(self))
    tokens = torch.randint(0, CFG.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    _, grads = _model_outputs(model, tokens, True, monkeypatch)
    n_chunks = -(-T // 16)
    layers = [b.attn.wkv_b for b in model.layers]
    assert {id(m) for m in calls} == {id(m) for m in layers}
    assert len(calls) == 2 * n_chunks * len(layers)  # each chunk's forward and its recomputation in backward
    for i in range(len(layers)):
        assert grads[f"layers.{i}.attn.wkv_b.weight"].abs().max() > 0
