"""BF16 GEMMs through FP32 kernels where the CPU has no native BF16 GEMMs (``flyer.model.lowp``),
and ``--precision auto``. The emulated path is forced here, so every machine tests it; its oracle
is ATen's own BF16 GEMM (oneDNN's where native, else ATen's reference kernel) and FP64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bounds import rel_error as rel
from flyer import runtime
from flyer.config import preset
from flyer.model import lowp
from flyer.model.transformer import Transformer

bf16 = torch.bfloat16


def ulp(t: torch.Tensor) -> torch.Tensor:
    """BF16 spacing at |t| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), torch.frexp(t.float().abs()).exponent - 8)


def test_switch_and_env(monkeypatch):
    monkeypatch.delenv("FLYER_LOWP_EMULATION", raising=False)
    native = runtime.native_gemm("cpu", bf16)
    assert lowp.emulated("cpu", bf16) is (not native)
    with lowp.emulation(True):
        assert lowp.emulated("cpu", bf16) and lowp.emulated("cpu", torch.float16)
        assert not lowp.emulated("cpu", torch.float32) and not lowp.emulated("cuda", bf16)
        with lowp.emulation(False):
            assert not lowp.emulated("cpu", bf16)
        assert lowp.emulated("cpu", bf16)
    monkeypatch.setenv("FLYER_LOWP_EMULATION", "1")
    assert lowp.emulated("cpu", bf16)
    monkeypatch.setenv("FLYER_LOWP_EMULATION", "0")
    assert not lowp.emulated("cpu", bf16)
    with lowp.emulation(True):  # the context wins over the environment
        assert lowp.emulated("cpu", bf16)


@pytest.mark.parametrize("shape", [(64, 96, 48), (5, 130, 7)])
def test_mm_is_the_rounded_fp32_gemm_and_agrees_with_aten(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g).to(bf16), torch.randn(K, N, generator=g).to(bf16)
    with lowp.emulation(True):
        r = lowp.mm(a, b)
        out = torch.empty(M, N, dtype=bf16)
        assert lowp.mm(a, lowp.operand(b.float(), bf16), out=out) is out  # a pre-widened operand
    with lowp.emulation(False):
        aten = lowp.mm(a, b)
    assert r.dtype == bf16 and torch.equal(r, torch.mm(a.float(), b.float()).to(bf16)) and torch.equal(out, r)
    exact = a.double() @ b.double()
    # both are an FP32 sum rounded once to BF16: each within one BF16 ulp of the exact product
    assert ((r.double() - exact).abs() <= ulp(exact)).all()
    assert ((aten.double() - exact).abs() <= ulp(exact)).all()


@pytest.mark.parametrize("bias", [False, True])
def test_linear_under_autocast_matches_aten(bias):
    """Forward and both gradients (and the bias') in the dtypes autocast gives, as close to FP64 as
    ATen's BF16 GEMM is."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 96, generator=g)
    w = torch.randn(72, 96, generator=g) * 0.1
    b = torch.randn(72, generator=g) if bias else None
    dy = torch.randn(3, 40, 72, generator=g)

    def grads(emulate):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if bias else None
        with lowp.emulation(emulate), torch.autocast("cpu", dtype=bf16):
            y = lowp.linear(xx, ww, bb)
        y.backward(dy.to(y.dtype))
        return [y, xx.grad, ww.grad] + ([bb.grad] if bias else [])

    em, at = grads(True), grads(False)
    xd, wd = x.double().to(bf16).double(), w.to(bf16).double()
    ref = [xd @ wd.t() + (b.double() if bias else 0), dy.to(bf16).double() @ wd,
           dy.to(bf16).double().flatten(0, 1).t() @ xd.flatten(0, 1)] + ([dy.double().sum((0, 1))] if bias else [])
    for name, e, a, r in zip(("y", "dx", "dw", "db"), em, at, ref):
        assert e.dtype == a.dtype and e.shape == a.shape, name
        assert rel(e, r) <= 1.25 * rel(a, r) + 1e-6, (name, rel(e, r), rel(a, r))
        assert rel(e, a) < 1e-2, name
    assert em[0].dtype == bf16 and em[1].dtype == torch.float32 and em[2].dtype == torch.float32


def test_attention_emulated_matches_aten():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 33, 32, generator=g).to(bf16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    with lowp.emulation(True):
        e = lowp.scaled_dot_product_attention(q, k, v, is_causal=True)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert e.dtype == bf16
    assert rel(e, ref) <= 1.25 * rel(a, ref) + 1e-6


def _step(model, x, emulate, autocast=True):
    model.zero_grad(set_to_none=True)
    with lowp.emulation(emulate), torch.autocast("cpu", dtype=bf16, enabled=autocast):
        out = model.compute_loss(x[:, :-1], x[:, 1:])
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss.double(), grads


def test_model_step_emulated_is_as_close_to_fp32_as_aten_bf16():
    """The whole tiny model (MLA, dense FFN, routed + shared experts, fused loss, MTP): the BF16
    step through the emulated GEMMs is as close to the FP32 step as ATen's BF16 step is."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    l32, g32 = _step(model, x, None, autocast=False)
    le, ge = _step(model, x, True)
    la, ga = _step(model, x, False)
    assert torch.isfinite(ge).all()
    assert abs(le - l32) <= 2 * abs(la - l32) + 2e-3
    assert rel(ge, g32) <= 1.5 * rel(ga, g32) + 1e-3, (rel(ge, g32), rel(ga, g32))


class _GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every GEMM and attention kernel that runs."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(self.OPS):
            self.seen |= {(func.__name__, a.dtype) for a in args[:2] if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fp8", [False, True])
def test_emulated_step_runs_no_bf16_gemm(fp8):
    """With emulation on, a whole BF16-autocast training step (forward in autograd Functions under
    autocast included, FP8 recipe too) runs every GEMM and attention kernel in FP32."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Transformer(cfg)
    if fp8:
        from flyer.fp8 import convert_to_fp8

        convert_to_fp8(model)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    mode = _GemmDtypes()
    with mode:
        _step(model, x, True)
    assert mode.seen and {d for _, d in mode.seen} <= {torch.float32, torch.float64}, sorted(mode.seen, key=str)


def test_auto_precision(monkeypatch):
    assert runtime.resolve_precision("auto", "cpu") == ("bf16" if runtime.bf16_hardware("cpu") else "fp32")
    if runtime.bf16_hardware("cpu"):  # BF16 in hardware implies native BF16 GEMMs
        assert runtime.native_gemm("cpu", torch.bfloat16)
    # an AVX-512 CPU without BF16 instructions: oneDNN BF16 GEMMs, but auto keeps fp32
    monkeypatch.setattr(runtime, "native_gemm", lambda device, dtype: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.resolve_precision("auto", "cpu") == "fp32" and runtime.precision_note("bf16", "cpu") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")  # Arm: oneDNN's check decides
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(runtime, "native_gemm", lambda device, dtype: False)
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    assert "no native BF16 GEMMs" in runtime.precision_note("bf16", "cpu")
    assert runtime.precision_note("fp32", "cpu") is None
    monkeypatch.setattr(runtime, "native_gemm", lambda device, dtype: True)
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    assert runtime.precision_note("bf16", "cpu") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp4", "cpu")
