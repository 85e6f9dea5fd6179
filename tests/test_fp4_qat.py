"""DeepSeek-V4's FP4 QAT of the routed experts (``flyer train --fp4-experts``, ``flyer.fp8.fp4``).

Oracles: a copy of the model whose routed expert weights are replaced by their FP4 values (the forward and
gradients QAT must reproduce: exact in FP32, as both run the same ops on the same values); the published format's
decoder flyer reads checkpoints with (``flyer.interop.v4_quant.dequantize_fp4_e2m1``) and transformers' FP4
dequantizer for the codec; ``flyer export --dtype fp8`` loaded back for what inference runs on. Every FP4 value is a
code times a power of two, exact in FP32, so values compare bit for bit; a mutant (no quantization, groups along
the output dimension, one scale per 128) must land 10x beyond ``v4_tolerance``, FP32 rounding's bound on the logits.
"""

import copy

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.fp8 import convert_to_fp8
from flyer.fp8.fp4 import E2M1_VALUES, e2m1_codes, e2m1_decode, fp4_experts, fp4_exponents, fp4_round_trip
from flyer.fp8.linear import FP8Experts
from flyer.fp8.quant import dequantize_blocks_batched, quantize_blocks_batched
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from flyer.interop.v4_quant import dequantize_fp4_e2m1, quantize_fp4_e2m1
from flyer.model.experts import Experts
from flyer.model.moe import moe_layers
from flyer.model.transformer import Transformer
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_qwen3 import TEXT, rel
from tests.test_v4_quant import hf_dequantize, weights  # noqa: F401 (a fixture)

VOCAB, T = 256, 32


def _cfg():
    return preset("tiny-v4", vocab_size=VOCAB)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _routed(model) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def _replace_experts(model, fn) -> None:
    """Every routed expert stack w of ``model`` becomes fn(w), in place."""
    with torch.no_grad():
        for ex in _routed(model):
            for w in (ex.w1, ex.w2, ex.w3):
                w.copy_(fn(w))


def _groups_along_outputs(w):  # mutant: scale groups of 32 output rows instead of 32 inputs
    return fp4_round_trip(w.transpose(-1, -2)).transpose(-1, -2)


def _scale_per_128(w):  # mutant: one scale per 128 consecutive values (of the flattened stack: rows are 64 wide)
    groups = w.float().reshape(-1, 128).unflatten(-1, (1, 128))
    e = fp4_exponents(groups)
    return e2m1_decode(e2m1_codes(groups, e), e).reshape(w.shape)


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model.compute_loss(x[:, :-1], x[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- 1. the QAT forward and backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["fused_local", "dispatched", "fp8"])
def test_qat_is_the_round_tripped_copy_forward_and_straight_through_gradients(path):
    """QAT on the masters gives the logits, loss and every gradient of a copy holding the FP4 values as its weights
    (the gradient w.r.t. a master is the copy's w.r.t. its FP4 weight: straight through), bit for bit; only routed
    experts are quantized (the shared expert is not); the mutants land far outside."""
    torch.manual_seed(0)
    qat = Transformer(_cfg())
    if path == "dispatched":
        for m in moe_layers(qat):
            m.fuse_local = False
    if path == "fp8":
        convert_to_fp8(qat)
    plain = copy.deepcopy(qat)  # never run: deep-copied again for each mutant
    copy_ = copy.deepcopy(qat)
    names = fp4_experts(qat)
    assert len(names) == _cfg().n_layers + _cfg().mtp_depth and all(".shared" not in n for n in names)  # MTP's too
    assert all(m.path == ("dispatched" if path != "fused_local" else "fused_local") for m in moe_layers(qat))
    if path == "fp8":  # the copy's FP8 experts take the same UE8M0 block scales QAT switches on
        for ex in _routed(copy_):
            ex.recipe = next(iter(_routed(qat))).recipe
        assert all(isinstance(ex, FP8Experts) and ex.recipe.pow2_scales for ex in _routed(qat))
    _replace_experts(copy_, fp4_round_trip)
    x = _tokens()
    with torch.no_grad():
        want, got = copy_(x), qat(x)
    assert torch.equal(got, want)
    loss_q, grads_q = _loss_and_grads(qat, x)
    loss_c, grads_c = _loss_and_grads(copy_, x)
    assert torch.equal(loss_q, loss_c) and grads_q.keys() == grads_c.keys()
    assert any(".experts.w" in n for n in grads_q)
    for n in grads_q:
        assert torch.equal(grads_q[n], grads_c[n]), n
    tol = v4_tolerance(_cfg(), T)
    for mutant in (lambda w: w, _groups_along_outputs, _scale_per_128):
        wrong = copy.deepcopy(plain)
        if path == "fp8":
            for ex in _routed(wrong):
                ex.recipe = next(iter(_routed(qat))).recipe
        with torch.no_grad():
            for ex, src in zip(_routed(wrong), _routed(qat)):
                for w, m in ((ex.w1, src.w1), (ex.w2, src.w2), (ex.w3, src.w3)):
                    w.copy_(mutant(m))
            err = rel(wrong(x), got)
        print(f"mutant {getattr(mutant, '__name__', 'none')}: relative logit error {err:.3g} (tolerance {tol:.3g})")
        assert err > 10 * tol, f"{err:.3g} vs tolerance {tol:.3g}"


def test_fp4_values_in_ue8m0_128x128_e4m3_blocks_are_exact_and_amax_scales_are_not():
    """The FP8 experts' forward quantizes the FP4 values again in 128x128 E4M3 blocks: lossless with power-of-two
    scales wherever a block's group scales span at most 14 binades (E4M3 has 2 more exponent bits than E2M1, and
    subnormals: ``flyer.fp8.fp4``), which weights of one init or training never approach; an amax / 448 scale
    (448 / 6 not a power of two) moves most values. Rows spread over 16 binades break the bound, and only there."""
    w = torch.randn(4, 256, 384, generator=torch.Generator().manual_seed(7)) * 0.02
    r = fp4_round_trip(w)
    assert torch.equal(dequantize_blocks_batched(*quantize_blocks_batched(r, "e4m3", pow2_scales=True)), r)
    moved = dequantize_blocks_batched(*quantize_blocks_batched(r, "e4m3", pow2_scales=False))
    assert (moved != r).float().mean() > 0.3
    spread = fp4_round_trip(weights((256, 384), 7))  # rows scaled by 2**-12 .. 2**3
    lost = dequantize_blocks_batched(*quantize_blocks_batched(spread[None], "e4m3", pow2_scales=True))[0] != spread
    groups = spread.unflatten(-1, (-1, 32))
    e = fp4_exponents(groups).float().masked_fill(groups.abs().amax(-1) == 0, float("nan"))  # (256, 12)
    blocks = e.unflatten(0, (2, 128)).unflatten(2, (3, 4)).transpose(1, 2).flatten(2)  # (2, 3, 512)
    span = blocks.nan_to_num(-1e9).amax(-1) - blocks.nan_to_num(1e9).amin(-1)
    lost_blocks = lost.unflatten(0, (2, 128)).unflatten(2, (3, 128)).any(3).any(1)
    assert lost_blocks.any() and (span[lost_blocks] > 14).all()


def test_expert_parallel_slices_quantize_as_the_whole_stack():
    """Groups run along one row's inputs, inside one expert: any rank's slice of experts quantizes alike."""
    w = weights((8 * 64, 128), 2).view(8, 64, 128)
    whole = fp4_round_trip(w)
    for first, n in ((0, 4), (4, 4), (2, 3)):
        assert torch.equal(fp4_round_trip(w[first:first + n]), whole[first:first + n])


# --- 2. the codec ----------------------------------------------------------------------------------------------

def test_round_trip_is_the_checkpoint_decoder_of_the_checkpoint_encoder():
    for shape, seed in (((64, 256), 0), ((3, 4096), 1), ((128, 96), 2)):
        w = weights(shape, seed)
        assert torch.equal(fp4_round_trip(w), dequantize_fp4_e2m1(*quantize_fp4_e2m1(w)))


def test_values_on_the_grid_are_fixed_points_and_the_round_trip_is_idempotent():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (64, 8, 32), generator=g, dtype=torch.uint8)
    exponents = torch.randint(-20, 5, (64, 8), generator=g, dtype=torch.int32)
    codes[:5] = torch.randint(0, 8, (5, 8, 32), generator=g, dtype=torch.uint8) % 4  # groups topped by 1.5: rescaled
    grid = e2m1_decode(codes, exponents).flatten(-2)
    assert torch.equal(fp4_round_trip(grid), grid)
    once = fp4_round_trip(weights((64, 256), 5))
    assert torch.equal(fp4_round_trip(once), once)
    assert not torch.equal(fp4_round_trip(weights((64, 256), 5)), weights((64, 256), 5))


def test_scale_is_the_smallest_power_of_two_bringing_the_group_within_six():
    w = weights((256, 256), 6)
    w[0, :32] = 0.0  # an all-zero group: scale 1
    w[1, :32] = 6.0 * 2.0**-3  # amax exactly 6 * 2**e: that e
    groups = w.unflatten(-1, (-1, 32))
    amax = groups.abs().amax(-1)
    e = fp4_exponents(groups)
    scale = torch.ldexp(torch.ones_like(amax), e)
    nonzero = amax > 0
    assert (amax <= 6 * scale).all() and (amax[nonzero] > 3 * scale[nonzero]).all()  # amax / (scale / 2) > 6
    assert e[0, 0] == 0 and e[1, 0] == -3
    _, stored = quantize_fp4_e2m1(w)
    assert torch.equal(stored.view(torch.uint8).int() - 127, e)
    values = fp4_round_trip(w).unflatten(-1, (-1, 32)) / scale.unsqueeze(-1)
    assert torch.isin(values, E2M1_VALUES).all()


@pytest.mark.parametrize("shape", [(64, 256), (5, 4096)])  # whole 128-wide blocks: transformers mis-sizes others
def test_round_trip_agrees_with_transformers_fp4_dequantizer(hf_dequantize, shape):  # noqa: F811
    deq, _ = hf_dequantize
    w = weights(shape, 8)
    packed, scale = quantize_fp4_e2m1(w)
    assert torch.equal(fp4_round_trip(w), deq._dequantize_one(packed, scale, output_dtype=torch.float32))


# --- 3. trained with QAT, exported, loaded -------------------------------------------------------------------------

def _train(tmp_path, name, precision, fp4):
    (tmp_path / "text.txt").write_text(TEXT)
    tc = TrainConfig(preset="tiny-v4", steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=1, ckpt_every=3,
                     out=str(tmp_path / name), data=str(tmp_path / "text.txt"), data_cache=str(tmp_path / "cache"),
                     seed=1, progress=False, plots=False, warmup=1, lr=3e-3, device="cpu", precision=precision,
                     vocab_size=320, fp4_experts=fp4)
    t = Trainer(tc, log=lambda _m: None)
    t.run()
    return t.model


def _exported(tmp_path, name):
    export(tmp_path / name, tmp_path / f"{name}-fp8", "fp8")
    return load_hf(tmp_path / f"{name}-fp8", dtype=torch.float32)[0]


def _with_masters(loaded, trained, qat: bool):
    """The loaded export with the trained FP32 masters back in its routed experts (QAT on or off): every other
    weight is the export's (its FP8 attention weights are not this test's subject)."""
    model = copy.deepcopy(loaded)
    with torch.no_grad():
        for ex, src in zip(_routed(model), _routed(trained)):
            for w, m in ((ex.w1, src.w1), (ex.w2, src.w2), (ex.w3, src.w3)):
                w.copy_(m)
    if qat:
        fp4_experts(model)
    return model.eval()


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_export_after_qat_stores_what_training_multiplied_by(tmp_path, precision):
    trained = _train(tmp_path, "qat", precision, fp4=True)
    assert all(ex.weight_quant is not None for ex in _routed(trained))
    loaded = _exported(tmp_path, "qat")
    for ex, src in zip(_routed(loaded), _routed(trained)):
        for w, m in ((ex.w1, src.w1), (ex.w2, src.w2), (ex.w3, src.w3)):
            assert torch.equal(w, fp4_round_trip(m))  # the FP4 values of the last forward, stored losslessly
            if precision == "fp8":  # and what its FP8 experts' E4M3 blocks held
                held = dequantize_blocks_batched(*quantize_blocks_batched(w, "e4m3", True))[..., :w.shape[-1]]
                assert torch.equal(held, w)
    x = _tokens(3)
    with torch.no_grad():
        want = loaded(x)
        assert torch.equal(_with_masters(loaded, trained, qat=True)(x), want)
        err, tol = rel(_with_masters(loaded, trained, qat=False)(x), want), v4_tolerance(loaded.cfg, T)
    assert err > 10 * tol, f"{err:.3g} vs {tol:.3g}"  # the masters themselves are not what inference runs


def test_without_qat_the_exported_fp4_experts_change_the_logits(tmp_path):
    trained = _train(tmp_path, "plain", "fp32", fp4=False)
    assert all(ex.weight_quant is None for ex in _routed(trained))
    loaded = _exported(tmp_path, "plain")
    x = _tokens(3)
    with torch.no_grad():
        err, tol = rel(_with_masters(loaded, trained, qat=False)(x), loaded(x)), v4_tolerance(loaded.cfg, T)
    assert err > 10 * tol, f"{err:.3g} vs {tol:.3g}"


# --- 4. the CLI ------------------------------------------------------------------------------------------------

def test_fp4_experts_on_a_model_without_routed_experts_is_one_line(tmp_path, capsys):
    rc = main(["train", "--preset", "qwen2.5-72b", "--fp4-experts", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("flyer: error: --fp4-experts: quantizes routed experts, and this model has none")
    assert not (tmp_path / "run").exists()
