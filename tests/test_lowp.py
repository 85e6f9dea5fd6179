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
    assert lowp.emulated("cpu", bf16) is (not runtime.bf16_hardware("cpu"))
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
    """One forward and backward, both under ``emulation(emulate)``."""
    model.zero_grad(set_to_none=True)
    with lowp.emulation(emulate):
        with torch.autocast("cpu", dtype=bf16, enabled=autocast):
            out = model.compute_loss(x[:, :-1], x[:, 1:])
        out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss.double(), grads


@pytest.mark.parametrize("kind", ["emulated", "avx2", "avx512", "amx"])
def test_model_step_is_as_close_to_fp32_as_aten_bf16(kind):
    """The whole tiny model (MLA, dense FFN, routed + shared experts, fused loss, MTP): the BF16
    step with emulation forced on, and with each CPU kind's own decisions (forced, on whatever CPU
    runs the tests), is as close to the FP32 step as ATen's BF16 step is."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    l32, g32 = _step(model, x, None, autocast=False)
    la, ga = _step(model, x, False)
    if kind == "emulated":
        lk, gk = _step(model, x, True)
    else:
        with runtime.assume_cpu(kind):
            lk, gk = _step(model, x, None)
    assert torch.isfinite(gk).all()
    assert abs(lk - l32) <= 2 * abs(la - l32) + 2e-3
    assert rel(gk, g32) <= 1.5 * rel(ga, g32) + 1e-3, (rel(gk, g32), rel(ga, g32))


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


DSA = {"index_topk": 8, "index_n_heads": 2, "index_head_dim": 32}


@pytest.mark.parametrize("name, over, T, fp8", [("tiny", {}, 33, False), ("tiny", {}, 33, True),
                                                ("tiny-v4", {}, 33, False), ("tiny", DSA, 129, False)])
def test_emulated_step_runs_no_bf16_gemm(name, over, T, fp8):
    """With emulation on, a whole BF16-autocast training step (forward in autograd Functions under
    autocast included, FP8 recipe too) runs every GEMM and attention kernel in FP32. DeepSeek-V4's attention,
    grouped output projection and hyper-connection maps, and DSA's indexer and sparse absorbed attention (129
    tokens: past the dense chunk) ran ATen's BF16 bmm / mm, the kernels emulation avoids."""
    torch.manual_seed(0)
    cfg = preset(name, **over)
    model = Transformer(cfg)
    if fp8:
        from flyer.fp8 import convert_to_fp8

        convert_to_fp8(model)
    x = torch.randint(0, cfg.vocab_size, (1 if T > 64 else 2, T))
    mode = _GemmDtypes()
    with mode:
        _step(model, x, True)
    assert mode.seen and {d for _, d in mode.seen} <= {torch.float32, torch.float64}, sorted(mode.seen, key=str)


def test_backward_follows_the_forwards_emulation_choice():
    """A weight widened by ``operand`` in an emulated forward carries that choice into a backward
    run under another setting (here: emulation off, as on a CPU with BF16 hardware) instead of
    mixing BF16 and FP32 operands in one GEMM (a RuntimeError before)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with lowp.emulation(True), torch.autocast("cpu", dtype=bf16):
        out = model.compute_loss(x[:, :-1], x[:, 1:])
    with lowp.emulation(False):
        out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    _, emulated = _step(model, x, True)
    # the backward takes the forward's path (the experts save their choice); the loss and attention decide anew
    assert torch.isfinite(grads).all() and rel(grads, emulated) < 1e-2
    a, w = torch.randn(4, 8).to(bf16), lowp.operand(torch.randn(8, 3), bf16)
    with lowp.emulation(False):
        assert lowp.mm(a, w).dtype == bf16  # the widened operand decides: through FP32


# What each kind of CPU flyer tells apart decides, forced with runtime.assume_cpu whatever this
# machine is: (BF16 GEMM kind, auto precision, BF16 emulated through FP32, oneDNN in gemm_ways)
CPU_DECISIONS = {
    "avx2": ("reference", "fp32", True, False),
    "avx512": ("widened", "fp32", True, True),
    "avx512_bf16": ("hardware", "bf16", False, True),
    "amx": ("hardware", "bf16", False, True),
    "arm": ("reference", "fp32", True, False),
    "arm_bf16": ("hardware", "bf16", False, True),
}


def test_every_cpu_kind_is_covered():
    assert set(CPU_DECISIONS) == set(runtime.CPU_KINDS)


@pytest.mark.parametrize("kind", list(CPU_DECISIONS))
def test_cpu_kind_decisions(kind, monkeypatch):
    from flyer.model.experts import CPU_LOWP_ROW_MULTIPLE, Experts
    from flyer.train.metrics import gemm_ways

    monkeypatch.delenv("FLYER_LOWP_EMULATION", raising=False)
    gemm, auto, emulate, onednn = CPU_DECISIONS[kind]
    with runtime.assume_cpu(kind):
        assert runtime.cpu_kind() == kind and runtime.bf16_gemm_kind("cpu") == gemm
        assert runtime.bf16_hardware("cpu") is (gemm == "hardware")
        assert runtime.native_gemm("cpu", bf16) is (gemm != "reference")
        assert runtime.resolve_precision("auto", "cpu") == auto
        assert runtime.resolve_precision("bf16", "cpu") == "bf16"
        assert lowp.emulated("cpu", bf16) is emulate
        assert not lowp.emulated("cpu", torch.float32)
        # oneDNN JITs a kernel per GEMM shape: expert rows are padded only where it runs them
        x = torch.zeros(3, 4)
        assert Experts.row_multiple(x, bf16) == (1 if emulate else CPU_LOWP_ROW_MULTIPLE)
        assert Experts.row_multiple(x, torch.float32) == 1
        note = lowp.precision_note("bf16", "cpu")
        assert (note is None) is (gemm == "hardware")
        if note:
            assert "through the FP32 kernel" in note and "auto picks fp32" in note
        with lowp.emulation(False):
            note = lowp.precision_note("fp8", "cpu")
            assert (note is None) is (gemm == "hardware")
            if note:
                assert {"widened": "widen to FP32", "reference": "reference kernel"}[gemm] in note
        assert lowp.precision_note("fp32", "cpu") is None
        ways = gemm_ways(bf16, "cpu")
        assert any("oneDNN" in w for w in ways) is onednn and True in ways.values()
        assert list(gemm_ways(torch.float32, "cpu").values()) == [None]


@pytest.mark.parametrize("tensor_cores", [True, False])
def test_cuda_decisions(tensor_cores, monkeypatch):
    """CUDA, forced: BF16 in hardware from Ampere on; never emulated through FP32 by flyer."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: tensor_cores)
    assert runtime.bf16_gemm_kind("cuda") == ("hardware" if tensor_cores else "reference")
    assert runtime.resolve_precision("auto", "cuda") == ("bf16" if tensor_cores else "fp32")
    assert not lowp.emulated("cuda", bf16)
    note = lowp.precision_note("bf16", "cuda")
    assert (note is None) is tensor_cores and (tensor_cores or "are emulated" in note)


def test_assume_cpu_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="cpu kind must be one of"):
        with runtime.assume_cpu("avx1024"):
            pass


def test_precision_choice():
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp4", "cpu")


def test_the_gemm_peak_is_measured_once_a_process(monkeypatch):
    """``fastest_gemm`` (every trainer's MFU denominator) measures each way once per process for a dtype, device
    and set of arguments, and again for another of any (a forced CPU kind names other ways)."""
    from flyer.train import metrics

    calls = []
    monkeypatch.setattr(metrics, "_PEAKS", {})
    monkeypatch.setattr(metrics, "measure_gemm_peak", lambda dtype, device, emulate=None, **kw:
                        calls.append((dtype, emulate, kw)) or 1.0 + bool(emulate))
    ways = metrics.gemm_ways(bf16, "cpu")
    first = metrics.fastest_gemm(bf16, "cpu")
    assert metrics.fastest_gemm(bf16, "cpu") == first == (2.0, next(w for w, e in ways.items() if e))
    assert len(calls) == len(ways)
    metrics.fastest_gemm(bf16, "cpu", seconds=0.1)
    metrics.fastest_gemm(torch.float32, "cpu")
    assert len(calls) == 2 * len(ways) + 1
    other = next(k for k in runtime.CPU_KINDS if metrics.gemm_ways(bf16, "cpu") != _ways_of(k))
    with runtime.assume_cpu(other):
        metrics.fastest_gemm(bf16, "cpu")
    assert len(calls) == 2 * len(ways) + 1 + len(_ways_of(other))


def _ways_of(kind: str) -> dict:
    from flyer.train.metrics import gemm_ways

    with runtime.assume_cpu(kind):
        return gemm_ways(bf16, "cpu")
